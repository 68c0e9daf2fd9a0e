// dotnet-script entry point: `dotnet-script services/csharp/app.csx -- PORT`.
// The program itself is Program.cs, shared with the Mono and .NET builds.
#load "Program.cs"

return CsharpDemo.Main(Args.ToArray());

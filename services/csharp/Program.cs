// Demo cgipool worker written in C# (Mono or .NET; base class library only).
//
//     GET /?service=demo&data=test
//     -> {"service": "demo", "data": "test", "language": "csharp", "runtime": "mono", "pid": ..., "port": ...}
//
// Missing parameters are null (still 200); any path other than / is a 404.
// Health probe: /?service=health.   Usage: csharp.exe PORT   (or $PORT)
//
// HTTP/1.1 keep-alive, one thread per connection, bound to 127.0.0.1.
// No namespace, so dotnet-script can #load this file as it is (app.csx).
using System;
using System.Collections.Generic;
using System.IO;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Threading;

public static class CsharpDemo
{
    const string Name = "csharp";
    const int MaxHead = 16 * 1024;
    const int MaxBody = 1 << 20;
    const int IdleTimeoutMs = 60 * 1000;
    static int port;
    static readonly int pid = System.Diagnostics.Process.GetCurrentProcess().Id;

    public static int Main(string[] args)
    {
        string raw = args.Length > 0 ? args[0] : Environment.GetEnvironmentVariable("PORT");
        if (raw == null || !int.TryParse(raw, out port) || port < 0 || port > 65535)
        {
            Console.Error.WriteLine(Name + ": usage: csharp.exe PORT   (or set $PORT); got " + (raw ?? "nothing"));
            return 2;
        }
        TcpListener listener = new TcpListener(IPAddress.Loopback, port);
        try
        {
            listener.Server.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            listener.Start(1024);
        }
        catch (SocketException e)
        {
            Console.Error.WriteLine(Name + ": cannot bind 127.0.0.1:" + port + ": " + e.Message);
            return 1;
        }
        port = ((IPEndPoint)listener.LocalEndpoint).Port;
        Console.Error.WriteLine(Name + ": listening on 127.0.0.1:" + port + " pid=" + pid + " runtime=" + Runtime());
        while (true)
        {
            TcpClient client = listener.AcceptTcpClient();
            Thread thread = new Thread(() => Serve(client));
            thread.IsBackground = true;
            thread.Start();
        }
    }

    static string Runtime()
    {
        return Type.GetType("Mono.Runtime") != null ? "mono" : "dotnet";
    }

    static void Serve(TcpClient client)
    {
        try
        {
            client.NoDelay = true;
            client.ReceiveTimeout = IdleTimeoutMs;
            using (NetworkStream stream = client.GetStream())
            using (BufferedStream input = new BufferedStream(stream, 8192))
            {
                while (HandleOne(input, stream)) { }
            }
        }
        catch (IOException) { }
        catch (SocketException) { }
        catch (ObjectDisposedException) { }
        finally
        {
            client.Close();
        }
    }

    // Reads one request and answers it; false when the connection should close.
    static bool HandleOne(Stream input, NetworkStream stream)
    {
        string head = ReadHead(input);
        if (head == null)
            return false;
        string[] lines = head.Split(new[] { "\r\n" }, StringSplitOptions.None);
        string[] requestLine = lines[0].Split(' ');
        if (requestLine.Length != 3 || !requestLine[2].StartsWith("HTTP/1."))
        {
            Send(stream, 400, "{\"error\": \"bad request line\"", "HTTP/1.1", true, false);
            return false;
        }
        string method = requestLine[0], target = requestLine[1], version = requestLine[2];
        bool close = version == "HTTP/1.0";
        long length = 0;
        for (int i = 1; i < lines.Length; i++)
        {
            int colon = lines[i].IndexOf(':');
            if (colon <= 0)
                continue;
            string name = lines[i].Substring(0, colon).Trim().ToLowerInvariant();
            string value = lines[i].Substring(colon + 1).Trim();
            if (name == "connection")
                close = value.ToLowerInvariant().Contains("close") ||
                        (version == "HTTP/1.0" && !value.ToLowerInvariant().Contains("keep-alive"));
            else if (name == "transfer-encoding")
            {
                Send(stream, 501, "{\"error\": \"chunked request bodies are not supported\"", version, true, false);
                return false;
            }
            else if (name == "content-length" && (!long.TryParse(value, out length) || length < 0))
            {
                Send(stream, 400, "{\"error\": \"invalid Content-Length\"", version, true, false);
                return false;
            }
        }
        if (length > MaxBody)
        {
            Send(stream, 413, "{\"error\": \"request body too large (max 1048576 bytes)\"", version, true, false);
            return false;
        }
        Skip(input, length);
        bool head_only = method == "HEAD";
        if (method != "GET" && method != "HEAD" && method != "POST")
        {
            Send(stream, 405, "{\"error\": \"method " + Json(method) + " not allowed (use GET, HEAD or POST)\"", version, close, head_only);
            return !close;
        }
        string path = target, query = "";
        int q = target.IndexOf('?');
        if (q >= 0)
        {
            path = target.Substring(0, q);
            query = target.Substring(q + 1);
        }
        if (path != "/")
        {
            Send(stream, 404, "{\"error\": \"not found: " + Json(path) + " (this worker only serves /)\"", version, close, head_only);
            return !close;
        }
        Dictionary<string, string> parameters = ParseQuery(query);
        string body = "{\"service\": " + JsonOrNull(parameters, "service") +
                      ", \"data\": " + JsonOrNull(parameters, "data") +
                      ", \"language\": \"csharp\", \"runtime\": \"" + Runtime() + "\"";
        Send(stream, 200, body, version, close, head_only);
        return !close;
    }

    static string ReadHead(Stream stream)
    {
        MemoryStream buffer = new MemoryStream();
        int matched = 0;
        while (true)
        {
            int b = stream.ReadByte();
            if (b < 0)
                return null;
            buffer.WriteByte((byte)b);
            if (buffer.Length > MaxHead)
                return null;
            matched = (b == '\r' && (matched == 0 || matched == 2)) || (b == '\n' && (matched == 1 || matched == 3)) ? matched + 1 : (b == '\r' ? 1 : 0);
            if (matched == 4)
                break;
        }
        string text = Encoding.GetEncoding("ISO-8859-1").GetString(buffer.ToArray());
        return text.Substring(0, text.Length - 4).TrimStart('\r', '\n');
    }

    static void Skip(Stream stream, long length)
    {
        byte[] scratch = new byte[8192];
        while (length > 0)
        {
            int n = stream.Read(scratch, 0, (int)Math.Min(scratch.Length, length));
            if (n <= 0)
                throw new IOException("client closed the connection");
            length -= n;
        }
    }

    static Dictionary<string, string> ParseQuery(string query)
    {
        Dictionary<string, string> result = new Dictionary<string, string>();
        foreach (string pair in query.Split('&'))
        {
            if (pair.Length == 0)
                continue;
            int eq = pair.IndexOf('=');
            string key = Decode(eq < 0 ? pair : pair.Substring(0, eq));
            string value = eq < 0 ? "" : Decode(pair.Substring(eq + 1));
            if (!result.ContainsKey(key))
                result[key] = value;
        }
        return result;
    }

    static string Decode(string text)
    {
        try
        {
            return Uri.UnescapeDataString(text.Replace('+', ' '));
        }
        catch (UriFormatException)
        {
            return text;
        }
    }

    static string JsonOrNull(Dictionary<string, string> parameters, string key)
    {
        string value;
        return parameters.TryGetValue(key, out value) ? "\"" + Json(value) + "\"" : "null";
    }

    static string Json(string text)
    {
        StringBuilder sb = new StringBuilder();
        foreach (char c in text)
        {
            if (c == '"' || c == '\\')
                sb.Append('\\').Append(c);
            else if (c < 0x20 || c > 0x7e)
                sb.Append("\\u").Append(((int)c).ToString("x4"));
            else
                sb.Append(c);
        }
        return sb.ToString();
    }

    // `json` is an unterminated object: the pid and port are added here.
    static void Send(NetworkStream stream, int status, string json, string version, bool close, bool headOnly)
    {
        string body = json + ", \"pid\": " + pid + ", \"port\": " + port + "}\n";
        byte[] payload = Encoding.ASCII.GetBytes(body);
        string head = "HTTP/1.1 " + status + " " + Reason(status) + "\r\n" +
                      "Content-Type: application/json\r\n" +
                      "Content-Length: " + payload.Length + "\r\n" +
                      "Cache-Control: no-store\r\n" +
                      "Connection: " + (close ? "close" : "keep-alive") + "\r\n\r\n";
        byte[] headBytes = Encoding.ASCII.GetBytes(head);
        byte[] all = new byte[headBytes.Length + (headOnly ? 0 : payload.Length)];
        Buffer.BlockCopy(headBytes, 0, all, 0, headBytes.Length);
        if (!headOnly)
            Buffer.BlockCopy(payload, 0, all, headBytes.Length, payload.Length);
        stream.Write(all, 0, all.Length);
    }

    static string Reason(int status)
    {
        switch (status)
        {
            case 200: return "OK";
            case 400: return "Bad Request";
            case 404: return "Not Found";
            case 405: return "Method Not Allowed";
            case 413: return "Payload Too Large";
            default: return "Not Implemented";
        }
    }
}
